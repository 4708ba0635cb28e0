"""Model definitions (Llama family, OPT) in Flax, configs, and checkpoint loading."""
