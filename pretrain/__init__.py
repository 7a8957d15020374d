"""CLOC pretraining: model, losses, Parquet loader (library half) and train/eval/export."""
