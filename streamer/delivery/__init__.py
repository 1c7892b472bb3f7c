"""Sending pushes and mail: pure payloads, one provider module per service, typed errors."""
