"""`faithlens reproduce`: the Results page's runs at full size, stage by stage, resumable."""
