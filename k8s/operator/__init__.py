"""The keyward operator (kopf). ``reconcile`` holds its decisions as plain
functions (no API calls); the kopf handlers that apply them are issue #5's
remaining work."""
