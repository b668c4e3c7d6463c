"""The workbench's screens: overview, layer inspector, decision stepper, prune, jobs, help."""
