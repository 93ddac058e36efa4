//! Physical constants (CODATA 2018), SI units.

/// Planck constant h, J·s.
pub const PLANCK: f64 = 6.626_070_15e-34;
/// Elementary charge e, C.
pub const ELEMENTARY_CHARGE: f64 = 1.602_176_634e-19;
/// Electron rest mass m₀, kg.
pub const ELECTRON_MASS: f64 = 9.109_383_701_5e-31;
/// Speed of light c, m/s.
pub const SPEED_OF_LIGHT: f64 = 299_792_458.0;
/// Electron rest energy m₀c², eV.
pub const ELECTRON_REST_ENERGY_EV: f64 = 510_998.950_00;
/// Atomic mass unit energy equivalent u·c², eV.
pub const AMU_ENERGY_EV: f64 = 931.494_102_42e6;
/// Atomic mass unit, kg.
pub const AMU: f64 = 1.660_539_066_60e-27;
/// Bohr radius a₀, m.
pub const BOHR_RADIUS: f64 = 5.291_772_109_03e-11;
/// Rydberg energy, eV.
pub const RYDBERG_EV: f64 = 13.605_693_122_994;
/// Fine-structure constant α.
pub const FINE_STRUCTURE: f64 = 7.297_352_569_3e-3;
/// Boltzmann constant, J/K.
pub const BOLTZMANN: f64 = 1.380_649e-23;
/// One ångström in metres.
pub const ANGSTROM: f64 = 1e-10;

/// Full width at half maximum of a Gaussian in units of its standard deviation, `2√(2 ln 2)`.
/// The one copy of this number: every FWHM ↔ σ conversion uses it.
pub const FWHM_PER_SIGMA: f64 = 2.354_820_045_030_949;

/// Intensity FWHM of an aberration-free, aperture-limited probe (the Airy disc's central peak)
/// in units of `λ/α` (wavelength over convergence semi-angle): FWHM ≈ 0.514 λ/α (Born & Wolf,
/// *Principles of Optics*, §8.5.2: the half-maximum of `[2J₁(v)/v]²` lies at `v = 1.6163`, and
/// `v = 2π α r/λ`, so the FWHM is `2 · 1.6163/(2π) λ/α`).
pub const AIRY_FWHM: f64 = 0.514;

/// Standard atomic mass in atomic mass units for elements 1..=92 (index = Z).
///
/// Used for knock-on damage (the nucleus mass M in T_max). Index 0 is unused.
pub const ATOMIC_MASS_U: [f64; 93] = [
    0.0, 1.008, 4.0026, 6.94, 9.0122, 10.81, 12.011, 14.007, 15.999, 18.998, 20.180, 22.990,
    24.305, 26.982, 28.085, 30.974, 32.06, 35.45, 39.948, 39.098, 40.078, 44.956, 47.867, 50.942,
    51.996, 54.938, 55.845, 58.933, 58.693, 63.546, 65.38, 69.723, 72.630, 74.922, 78.971, 79.904,
    83.798, 85.468, 87.62, 88.906, 91.224, 92.906, 95.95, 97.0, 101.07, 102.91, 106.42, 107.87,
    112.41, 114.82, 118.71, 121.76, 127.60, 126.90, 131.29, 132.91, 137.33, 138.91, 140.12, 140.91,
    144.24, 145.0, 150.36, 151.96, 157.25, 158.93, 162.50, 164.93, 167.26, 168.93, 173.05, 174.97,
    178.49, 180.95, 183.84, 186.21, 190.23, 192.22, 195.08, 196.97, 200.59, 204.38, 207.2, 208.98,
    209.0, 210.0, 222.0, 223.0, 226.0, 227.0, 232.04, 231.04, 238.03,
];

/// Chemical symbol for elements 1..=92 (index = Z). Index 0 is `"X"`.
pub const SYMBOLS: [&str; 93] = [
    "X", "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge",
    "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd",
    "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U",
];

/// Atomic number of a chemical symbol (case-sensitive, e.g. `"Si"`), if known.
pub fn atomic_number(symbol: &str) -> Option<u8> {
    SYMBOLS
        .iter()
        .position(|s| *s == symbol)
        .filter(|&z| z > 0)
        .map(|z| z as u8)
}
