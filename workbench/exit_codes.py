"""Exit codes of the command line, shared by the CLI and the batch runner."""

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
