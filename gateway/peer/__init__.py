"""Peer transfer: sealed packages between nodes over HTTPS with mutual TLS."""
