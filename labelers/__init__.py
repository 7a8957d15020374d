"""Model stages of VESL labeling: captioners, phrase extraction, detectors. No engine code here."""
