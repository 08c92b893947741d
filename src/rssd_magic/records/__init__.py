"""What a run leaves behind, and whether it may act: the record, its values, its signatures."""
