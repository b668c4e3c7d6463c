"""Fine-tuning (SPEC §7): the settings, standard / Fast-AT / SAM / ASAM steps, per-epoch
validation with the best model per metric, and resumable checkpoints. May import every engine
package except the pipeline, config and report on top."""
