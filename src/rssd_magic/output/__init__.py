"""Recording what a cell shows while it shows, and showing it again."""
