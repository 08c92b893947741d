"""IPython and the shell: the only modules that import IPython or click."""
