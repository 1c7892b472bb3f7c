"""Resumable change streams over Rocket.Chat's collections, and the caches they keep fresh.

- `streams.Sources`: the two change streams, messages and one database-wide for the
  other four collections (batched, resumable, reconnecting);
  the app starts `run()` after `CachedDirectory.load()`.
- `changes`: what each change document means (typed events, cache updates).
- `cache.CachedDirectory`: the hot path's `Directory`, bounded, falling back to queries.
- `resume`: where each stream left off, in the state collection.
- `events`: the typed events handed to the next stage.
"""
