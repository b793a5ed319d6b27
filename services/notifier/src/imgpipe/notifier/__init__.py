"""imgpipe notifier: signed, retried webhooks for request status changes."""
