"""The notification queue: a pure heap and schedule policy, persisted to a side collection."""
