"""Resumable change streams over Rocket.Chat's collections, and the caches they keep fresh."""
