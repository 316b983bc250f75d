"""Trusted side: CSPRNG, masking schemes and everything that holds masks, keys or private weights."""
