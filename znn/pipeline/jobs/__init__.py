"""Jobs: what each command does, from files to results (the CLI only parses arguments and calls these)."""
