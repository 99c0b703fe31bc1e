"""Decoding: dense and masked greedy decoding with a KV cache (generation.py), CUDA graphs (cuda_graph.py)."""
