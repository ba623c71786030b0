"""Ultrasound localization microscopy: simulator, clutter filters, localization, tracking, rendering."""
