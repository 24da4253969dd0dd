"""Readers and writers of the field's file formats: RELION STAR, MRC stacks, cryoSPARC .cs.

Every reader turns a format error into `JobInputError` naming the file (and row, where
there is one). Particle metadata of any source arrives as `star.ParticleTables`
(RELION 3.1 layout: an optics table plus a particles table).
"""
