"""Evaluation of an exported checkpoint: POPE, CHAIR, a judged benchmark, held-out loss, one report."""
