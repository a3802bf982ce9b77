"""Measuring models: quality on held-out data (accuracy, perplexity and agreement, retrieval), what they cost
(parameters, size, latency, throughput, peak memory), and exported students scored like the originals."""
