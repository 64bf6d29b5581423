//! PostgreSQL's ISO text forms of dates and times (`DateStyle=ISO`, `TimeZone=UTC`) as
//! Debezium's numbers and strings, over PostgreSQL's whole range: BC dates, years past 9999,
//! `24:00:00` and the infinities.
//!
//! The calendar is PostgreSQL's: proleptic Gregorian, year 1 BC followed by AD 1, computed
//! with integer arithmetic so no date of PostgreSQL's range falls outside it.

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i128 = 86_400 * MICROS_PER_SECOND as i128;

/// Debezium's `timestamp` for `'infinity'`: PostgreSQL JDBC's `DATE_POSITIVE_INFINITY`.
pub const TIMESTAMP_INFINITY: i64 = 9_223_372_036_825_200_000;
/// Debezium's `timestamp` for `'-infinity'`: PostgreSQL JDBC's `DATE_NEGATIVE_INFINITY`.
pub const TIMESTAMP_NEG_INFINITY: i64 = -9_223_372_036_832_400_000;
/// Debezium's `date` for `'infinity'`: the days of `+5877611-06-21`.
pub const DATE_INFINITY: i64 = 2_146_033_979;
/// Debezium's `date` for `'-infinity'`: the days of `-5877611-06-22`.
pub const DATE_NEG_INFINITY: i64 = -2_147_472_691;
/// Debezium's `timestamptz` for `'infinity'`: the instant of `DATE_POSITIVE_INFINITY` ms.
pub const TIMESTAMPTZ_INFINITY: &str = "+292278994-08-16T23:00:00Z";
/// Debezium's `timestamptz` for `'-infinity'`.
pub const TIMESTAMPTZ_NEG_INFINITY: &str = "-292275055-05-16T23:00:00Z";

/// `date` as days since 1970-01-01.
pub fn date_days(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(DATE_INFINITY),
        "-infinity" => return Some(DATE_NEG_INFINITY),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    parse_date(text, bc)
}

/// `time` as microseconds since midnight; `24:00:00` is a whole day.
pub fn time_micros(text: &str) -> Option<i64> {
    clock_micros(text)
}

/// `timestamp` as microseconds since 1970-01-01 00:00. Wider than `i64`: PostgreSQL's last
/// timestamps (294276 AD) are past `i64::MAX` microseconds from 1970.
pub fn timestamp_micros(text: &str) -> Option<i128> {
    match text {
        "infinity" => return Some(TIMESTAMP_INFINITY.into()),
        "-infinity" => return Some(TIMESTAMP_NEG_INFINITY.into()),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (date, clock) = text.split_once(' ')?;
    Some(i128::from(parse_date(date, bc)?) * MICROS_PER_DAY + i128::from(clock_micros(clock)?))
}

/// `timestamptz` as ISO-8601 in UTC (`2022-01-01T08:00:00Z`), years outside 0000-9999 with
/// their sign (`+10000-01-01T00:00:00Z`, `-0043-03-15T00:00:00Z` for 44 BC).
pub fn timestamptz_iso(text: &str) -> Option<String> {
    match text {
        "infinity" => return Some(TIMESTAMPTZ_INFINITY.into()),
        "-infinity" => return Some(TIMESTAMPTZ_NEG_INFINITY.into()),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (date, clock) = text.split_once(' ')?;
    // The offset starts at the last sign; a clock has none of its own.
    let sign_at = clock.rfind(['+', '-'])?;
    let (clock, offset) = clock.split_at(sign_at);
    let local =
        i128::from(parse_date(date, bc)?) * MICROS_PER_DAY + i128::from(clock_micros(clock)?);
    Some(iso_utc(local - i128::from(offset_micros(offset)?)))
}

/// Days since 1970-01-01 back as PostgreSQL's ISO date (`0044-03-15 BC`, `infinity`), the
/// text a `date` column takes in: the inverse of [`date_days`].
pub fn date_text(days: i64) -> String {
    match days {
        DATE_INFINITY => "infinity".into(),
        DATE_NEG_INFINITY => "-infinity".into(),
        days => {
            let (date, bc) = civil_text(days);
            format!("{date}{bc}")
        }
    }
}

/// Microseconds since midnight back as `HH:MM:SS.ffffff`: the inverse of [`time_micros`].
pub fn time_text(micros: i64) -> String {
    clock_text(micros)
}

/// Microseconds since 1970-01-01 back as PostgreSQL's ISO timestamp
/// (`2022-01-01 08:00:00.5`, `0044-03-15 00:00:00 BC`): the inverse of
/// [`timestamp_micros`].
pub fn timestamp_text(micros: i128) -> String {
    if micros == i128::from(TIMESTAMP_INFINITY) {
        return "infinity".into();
    }
    if micros == i128::from(TIMESTAMP_NEG_INFINITY) {
        return "-infinity".into();
    }
    let days = micros.div_euclid(MICROS_PER_DAY) as i64;
    let (date, bc) = civil_text(days);
    format!("{date} {}{bc}", clock_text(micros.rem_euclid(MICROS_PER_DAY) as i64))
}

/// An ISO 8601 instant as [`timestamptz_iso`] writes it (`2022-01-01T08:00:00.5Z`, the
/// signed years `-0043` for 44 BC and `+10000`, the infinity sentinels) back as text a
/// `timestamptz` column takes in (`0044-03-15 00:00:00+00 BC`, `infinity`); other text is
/// given as it is, for PostgreSQL to judge.
pub fn timestamptz_text(iso: &str) -> String {
    match iso {
        TIMESTAMPTZ_INFINITY => return "infinity".into(),
        TIMESTAMPTZ_NEG_INFINITY => return "-infinity".into(),
        _ => {}
    }
    let (negative, unsigned) = match iso.as_bytes().first() {
        Some(b'-') => (true, &iso[1..]),
        Some(b'+') => (false, &iso[1..]),
        _ => (false, iso),
    };
    let parsed = unsigned.split_once('-').and_then(|(year, rest)| {
        let year: i64 = year.parse().ok()?;
        let rest = rest.strip_suffix('Z')?.replacen('T', " ", 1);
        Some((if negative { -year } else { year }, rest))
    });
    let Some((year, rest)) = parsed else { return iso.to_string() };
    // ISO's year 0 is 1 BC.
    let (year, bc) = if year <= 0 { (1 - year, " BC") } else { (year, "") };
    format!("{year:04}-{rest}+00{bc}")
}

/// `YYYY-MM-DD` of a day since 1970, and ` BC` when its year is before 1.
fn civil_text(days: i64) -> (String, &'static str) {
    let (year, month, day) = civil_from_days(days);
    let (year, bc) = if year <= 0 { (1 - year, " BC") } else { (year, "") };
    (format!("{year:04}-{month:02}-{day:02}"), bc)
}

/// `HH:MM:SS[.ffffff]` of microseconds since midnight (`24:00:00` for a whole day).
fn clock_text(micros: i64) -> String {
    let seconds = micros / MICROS_PER_SECOND;
    let fraction = match micros % MICROS_PER_SECOND {
        0 => String::new(),
        f => format!(".{f:06}"),
    };
    format!("{:02}:{:02}:{:02}{fraction}", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

/// ` BC` ends the text of dates before year 1.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

/// `YYYY-MM-DD` (four or more year digits) as days since 1970-01-01.
fn parse_date(text: &str, bc: bool) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let year: i64 = digits(parts.next()?)?;
    let month: i64 = digits(parts.next()?)?;
    let day: i64 = digits(parts.next()?)?;
    // PostgreSQL's dates end in 5874897 AD; far larger years would overflow the arithmetic.
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !(1..=9_999_999).contains(&year) {
        return None;
    }
    // 1 BC is astronomical year 0, 44 BC is -43.
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// `HH:MM:SS[.ffffff]` as microseconds.
fn clock_micros(text: &str) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let mut parts = whole.splitn(3, ':');
    let hours: i64 = digits(parts.next()?)?;
    let minutes: i64 = digits(parts.next()?)?;
    let seconds: i64 = digits(parts.next()?)?;
    if hours > 24 || minutes > 59 || seconds > 60 || fraction.len() > 6 {
        return None;
    }
    let micros = if fraction.is_empty() {
        0
    } else {
        digits::<i64>(fraction)? * 10_i64.pow(6 - fraction.len() as u32)
    };
    Some(((hours * 60 + minutes) * 60 + seconds) * MICROS_PER_SECOND + micros)
}

/// `+HH[:MM[:SS]]` as microseconds east of UTC.
fn offset_micros(text: &str) -> Option<i64> {
    let (sign, rest) = match text.split_at_checked(1)? {
        ("+", rest) => (1, rest),
        ("-", rest) => (-1, rest),
        _ => return None,
    };
    let mut seconds = 0;
    for (n, part) in rest.split(':').enumerate() {
        if n > 2 || part.len() != 2 {
            return None;
        }
        seconds += digits::<i64>(part)? * [3600, 60, 1][n];
    }
    Some(sign * seconds * MICROS_PER_SECOND)
}

/// A run of ASCII digits as a number (no sign, no spaces).
fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date (astronomical year, month, day) of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

/// Microseconds since 1970 as `YYYY-MM-DDTHH:MM:SS[.fff[fff]]Z`: the fraction with 3 or 6
/// digits, or none when zero.
fn iso_utc(micros: i128) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY) as i64;
    let of_day = micros.rem_euclid(MICROS_PER_DAY) as i64;
    let (year, month, day) = civil_from_days(days);
    let year = match year {
        0..=9999 => format!("{year:04}"),
        10_000.. => format!("+{year}"),
        _ => format!("-{:04}", -year),
    };
    let seconds = of_day / MICROS_PER_SECOND;
    let fraction = match of_day % MICROS_PER_SECOND {
        0 => String::new(),
        f if f % 1000 == 0 => format!(".{:03}", f / 1000),
        f => format!(".{f:06}"),
    };
    format!(
        "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_read_back_as_their_text() {
        for text in [
            "1970-01-01",
            "2022-01-01",
            "0044-03-15 BC",
            "4714-11-24 BC",
            "5874897-12-31",
            "infinity",
            "-infinity",
        ] {
            let days = date_days(text).expect(text);
            assert_eq!(date_text(days), text);
        }
        for text in ["00:00:00", "08:30:05.123456", "24:00:00", "23:59:59.5"] {
            let micros = time_micros(text).expect(text);
            assert_eq!(time_micros(&time_text(micros)), Some(micros), "{text}");
        }
        for text in [
            "2022-01-01 08:00:00",
            "1969-12-31 23:59:59.999999",
            "0044-03-15 12:00:00 BC",
            "294276-12-31 23:59:59.999999",
            "infinity",
            "-infinity",
        ] {
            let micros = timestamp_micros(text).expect(text);
            assert_eq!(timestamp_text(micros), text);
        }
    }

    #[test]
    fn dates_count_days_across_the_whole_range() {
        assert_eq!(date_days("1970-01-01"), Some(0));
        assert_eq!(date_days("1969-12-31"), Some(-1));
        assert_eq!(date_days("2022-01-01"), Some(18_993));
        assert_eq!(date_days("10000-01-01"), Some(2_932_897));
        assert_eq!(date_days("0044-03-15 BC"), Some(-735_160), "44 BC is year -43");
        assert_eq!(date_days("0001-12-31 BC"), Some(date_days("0001-01-01").unwrap_or(0) - 1));
        assert_eq!(date_days("4714-11-24 BC"), Some(-2_440_588), "PostgreSQL's first day");
        assert_eq!(date_days("5874897-12-31"), Some(2_145_042_905), "and its last");
        assert_eq!(date_days("infinity"), Some(DATE_INFINITY));
        assert_eq!(date_days("-infinity"), Some(DATE_NEG_INFINITY));
        let huge = "99999999999999999-01-01";
        for bad in
            ["2022-13-01", "2022-01", "x", "", "0000-01-01", "-2022-01-01", "2022-01-01 AD", huge]
        {
            assert_eq!(date_days(bad), None, "{bad}");
        }
    }

    #[test]
    fn calendar_round_trips() {
        for days in [-2_440_588, -735_160, -1, 0, 59, 60, 18_993, 2_932_897, 2_145_042_905] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(DATE_INFINITY), (5_877_611, 6, 21));
        assert_eq!(civil_from_days(DATE_NEG_INFINITY), (-5_877_611, 6, 22));
    }

    #[test]
    fn times_include_the_end_of_the_day() {
        assert_eq!(time_micros("00:00:00"), Some(0));
        assert_eq!(time_micros("01:02:03"), Some(3_723_000_000));
        assert_eq!(time_micros("01:00:00.25"), Some(3_600_250_000));
        assert_eq!(time_micros("23:59:59.999999"), Some(86_399_999_999));
        assert_eq!(time_micros("24:00:00"), Some(86_400_000_000));
        assert_eq!(time_micros("25:00:00"), None);
        assert_eq!(time_micros("01:02"), None);
    }

    #[test]
    fn timestamps_are_microseconds_beyond_iso_years() {
        assert_eq!(timestamp_micros("1970-01-01 00:00:01.5"), Some(1_500_000));
        assert_eq!(timestamp_micros("2024-02-29 12:00:00"), Some(1_709_208_000_000_000));
        assert_eq!(
            timestamp_micros("0044-03-15 12:00:00 BC"),
            Some(-735_160 * MICROS_PER_DAY + 12 * 3_600_000_000)
        );
        assert_eq!(timestamp_micros("10000-01-01 00:00:00"), Some(2_932_897 * MICROS_PER_DAY));
        let last = timestamp_micros("294276-12-31 23:59:59.999999").expect("parses");
        assert!(last > i128::from(i64::MAX), "past i64, hence i128");
        assert_eq!(timestamp_micros("infinity"), Some(TIMESTAMP_INFINITY.into()));
        assert_eq!(timestamp_micros("-infinity"), Some(TIMESTAMP_NEG_INFINITY.into()));
    }

    #[test]
    fn timestamptz_is_iso_in_utc_with_signed_years() {
        assert_eq!(
            timestamptz_iso("2024-02-29 12:00:00.123456+00").as_deref(),
            Some("2024-02-29T12:00:00.123456Z")
        );
        assert_eq!(
            timestamptz_iso("2024-02-29 12:00:00+00").as_deref(),
            Some("2024-02-29T12:00:00Z")
        );
        assert_eq!(
            timestamptz_iso("2022-01-01 10:00:00.5+02").as_deref(),
            Some("2022-01-01T08:00:00.500Z")
        );
        assert_eq!(
            timestamptz_iso("2022-01-01 00:10:00-05:30").as_deref(),
            Some("2022-01-01T05:40:00Z")
        );
        assert_eq!(
            timestamptz_iso("10000-01-01 00:00:00+00").as_deref(),
            Some("+10000-01-01T00:00:00Z")
        );
        assert_eq!(
            timestamptz_iso("0044-03-15 00:00:00+00 BC").as_deref(),
            Some("-0043-03-15T00:00:00Z")
        );
        assert_eq!(
            timestamptz_iso("0001-01-01 00:00:00+00 BC").as_deref(),
            Some("0000-01-01T00:00:00Z")
        );
        assert_eq!(timestamptz_iso("infinity").as_deref(), Some(TIMESTAMPTZ_INFINITY));
        assert_eq!(timestamptz_iso("-infinity").as_deref(), Some(TIMESTAMPTZ_NEG_INFINITY));
        assert_eq!(timestamptz_iso("2022-01-01 00:00:00"), None, "no offset");
    }

    #[test]
    fn instants_read_back_as_timestamptz_text() {
        for (text, back) in [
            ("2022-01-01 10:00:00.5+02", "2022-01-01 08:00:00.500+00"),
            ("0044-03-15 00:00:00+00 BC", "0044-03-15 00:00:00+00 BC"),
            ("0001-06-01 00:00:00+00 BC", "0001-06-01 00:00:00+00 BC"),
            ("10000-01-01 00:00:00+00", "10000-01-01 00:00:00+00"),
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
        ] {
            let iso = timestamptz_iso(text).expect("valid");
            assert_eq!(timestamptz_text(&iso), back, "{text} as {iso}");
        }
        assert_eq!(timestamptz_text("not a time"), "not a time");
    }

    #[test]
    fn the_infinity_sentinels_are_the_instants_they_name() {
        let ms = i128::from(TIMESTAMP_INFINITY) * 1000;
        assert_eq!(iso_utc(ms), TIMESTAMPTZ_INFINITY);
        assert_eq!(iso_utc(i128::from(TIMESTAMP_NEG_INFINITY) * 1000), TIMESTAMPTZ_NEG_INFINITY);
    }
}
