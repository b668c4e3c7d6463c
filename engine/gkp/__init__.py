"""Grouped kernel pruning (SPEC §1-5): which layers, kernel smoothness, filter grouping
(snaking; TMI clustering in `clustering`, its ticket vote in `tmi`), grouped-kernel selection
(greedy, smooth beam search: `selection` over the batched search in `search`), decision traces,
the pruning plan and its orchestrator (`planner`), and reconstruction into dense grouped
convolutions. May import `engine.common` and `engine.models`."""
