"""Sources, stage wiring, shard writing with resume, and the engines that run stages."""
