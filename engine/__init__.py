"""Computation core of gkp-workbench: everything that computes, in sub-packages named for what
they hold, with the pipeline (`pipeline`), the run configuration (`config`) and the report
(`report`) on top. Never imports Textual, Rich, `workbench`, `widgets` or `sample_models`.

Layers, each importing only those before it: `common` < `models` < `gkp` < `baselines`,
`formats` < `data` < `robustness` < `training` < `pipeline`, `config`, `report`."""
