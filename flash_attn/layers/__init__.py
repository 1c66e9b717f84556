"""Model building blocks (rotary embedding)."""
