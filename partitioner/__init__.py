"""Partitioner: turns a labelled graph into ordered enclave/GPU stages."""
