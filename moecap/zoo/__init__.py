"""Models that moecap builds itself, from text already on the machine (no download)."""
