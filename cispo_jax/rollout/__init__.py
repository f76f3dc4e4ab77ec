"""Sampling rollouts: the static sampler, the engine protocol and its engines, the pipelined producer."""
