"""Evaluation: the GKT paper's Table 2 on GSM8K, CSQA and AQuA, offline in one process or live over gRPC."""
