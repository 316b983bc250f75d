"""Untrusted side: what runs on the GPU host. It never imports `enclave_runtime` (no masks, keys, private weights)."""
