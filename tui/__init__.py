"""The client's front door: the ``splitlm`` command. Headless subcommands need only
``splitlm.shared``; ``chat`` loads the Textual app."""
