"""Truth located by hand on the NIH films of the shared data, for the tests and the body-mask benchmark."""

# Burned-in side letters lying on background, found by eye on the NIH films: (file, y0, y1, x0, x1) in pixels.
LETTERS = [("00000820_000.png", 4, 27, 949, 974), ("00000820_000.png", 52, 96, 947, 973),
           ("00026911_000.png", 57, 98, 894, 917), ("00022084_000.png", 54, 82, 950, 972),
           ("00002578_000.png", 113, 147, 964, 993), ("00007217_000.png", 70, 97, 970, 1010),
           ("00000550_000.png", 41, 77, 909, 932)]

# The lungs of two NIH films outlined by eye (inside the lung fields), in 512 x 512 coordinates of the film:
# (the patient's right lung, left lung). 00000129: PA, a marker on the shoulder; 00013125: AP portable, with an
# arrow, letters and "AP PORTABLE" burned in.
LUNG_OUTLINES = {
    "00000129_000.png": [
        [(130, 48), (100, 68), (80, 120), (70, 200), (68, 280), (72, 338), (150, 342), (215, 336), (232, 300),
         (240, 200), (245, 130), (235, 70), (200, 44), (160, 40)],
        [(330, 44), (300, 70), (300, 150), (310, 250), (333, 300), (373, 333), (440, 345), (468, 335), (472, 250),
         (462, 150), (440, 88), (400, 52), (360, 42)]],
    "00013125_000.png": [
        [(150, 80), (110, 100), (80, 150), (65, 220), (62, 290), (75, 330), (150, 320), (215, 300), (225, 220),
         (228, 150), (215, 95), (190, 75)],
        [(330, 70), (295, 95), (285, 160), (300, 230), (360, 270), (420, 310), (455, 300), (460, 220), (445, 140),
         (420, 90), (380, 65)]],
}
