"""The HTTP front: a Flask application translating HTTP to the core and back."""
