"""Reports a person reads: one self-contained HTML page per ``optimize`` / ``tune`` / ``sensitivity`` run."""
