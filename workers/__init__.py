"""What runs inside shardstep's actors: optimizers, layers, shard actors, gradient workers."""
