"""Resumable change streams over Rocket.Chat's collections, and the caches they keep fresh.

- `streams.Sources`: one database-wide change stream over the five collections
  (batched, resumable, reconnecting);
  the app starts `run()` after `CachedDirectory.load()`.
- `changes`: what each change document means (typed events, cache updates).
- `cache.CachedDirectory`: the hot path's `Directory`, bounded, falling back to queries.
- `resume`: where the stream left off, in the state collection.
- `events`: the typed events handed to the next stage.
"""
