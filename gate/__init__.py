"""mmogate: a game gateway on Twisted."""
