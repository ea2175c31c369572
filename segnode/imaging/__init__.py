"""Images as arrays with geometry."""
