"""DingTalk: the client (the only module that talks HTTP to DingTalk), the fake server, robot alerts."""

from zkdingsync.dingtalk.client import DingTalkClient, DingTalkError

__all__ = ["DingTalkClient", "DingTalkError"]
