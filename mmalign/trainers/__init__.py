"""Rollouts and alignment algorithms (PRDP, DDPO/GRPO, ReNO, D²-Align, VLM GRPO)."""
