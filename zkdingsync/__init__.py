"""zkdingsync: deliver every punch from ZKTeco-protocol time clocks to DingTalk attendance, exactly once."""

__version__ = "0.1.0"
