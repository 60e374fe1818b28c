"""Entry points that compose the library: the training CLI, configs, paper scripts."""
