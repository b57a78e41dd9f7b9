"""The ``grokfast-metrics`` command (``main``); its subcommands live beside the layers they drive."""
