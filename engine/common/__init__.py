"""What every part of the engine shares: error types, progress and cancellation, config value
checks, atomic file writes, device selection and per-device numerics, the torchrun process
context and handing freed memory back to the OS. Imports nothing else of the project; only
`distributed` loads torch at import (the TUI reads configs without it)."""
