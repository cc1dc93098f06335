"""zpipe plugins for the 4D Camera (576x576 uint16 frames read out as four 144x576 sectors)."""

FRAME_SHAPE = (576, 576)
SECTOR_SHAPE = (144, 576)
SECTORS = 4
