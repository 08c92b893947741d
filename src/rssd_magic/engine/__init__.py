"""One cell: its key, the decision, the claim, then a run or a replay.  No IPython."""
