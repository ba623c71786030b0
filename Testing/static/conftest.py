"""The fixture modules are Slicer scripted modules, not tests: never collect or import them."""

collect_ignore_glob = ["fixtures/*"]
