"""Talking to terminals: byte layouts and time codec (`records`) and the pyzk adapter (`zk`)."""
