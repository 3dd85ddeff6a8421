"""The kernel every service shares: settings, event catalogue, event store, relay, consumers, auth, HTTP."""
