"""Where synthetic people live, what they are called and how they are identified: France and the US.

Phone numbers come from ranges reserved for fiction (ARCEP's 01 99 00 … and 06 39 98 …
in France, 555-01xx in North America); US social security numbers start with 999,
which is never issued; e-mail domains are the reserved example.* ones.
"""
from __future__ import annotations

import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import date
from random import Random

from service.synthetic.build import V2_0203, Code

BCP47 = "urn:ietf:bcp:47"
NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
#: Massachusetts driver's licences, as Synthea writes them.
DRIVERS_LICENSE_SYSTEM = "urn:oid:2.16.840.1.113883.4.3.25"


@dataclass(frozen=True)
class City:
    name: str
    region: str
    postcodes: tuple[str, ...]
    lat: float
    lon: float
    utc_offset: int
    #: France: the fictional landline prefix of the area; United States: the area code.
    phone: str
    weight: int
    #: France: INSEE code of the commune, used in the NIR of people born there.
    insee: str = ""


_FR_CITIES = (
    City("Paris", "Île-de-France", tuple(f"750{n:02d}" for n in range(1, 21)), 48.8566, 2.3522, 1, "+33 1 99 00", 21,
         "75112"),
    City("Marseille", "Provence-Alpes-Côte d'Azur", tuple(f"130{n:02d}" for n in range(1, 17)), 43.2965, 5.3698, 1,
         "+33 4 65 71", 9, "13205"),
    City("Lyon", "Auvergne-Rhône-Alpes", tuple(f"6900{n}" for n in range(1, 10)), 45.7640, 4.8357, 1, "+33 4 65 71", 8,
         "69383"),
    City("Toulouse", "Occitanie", ("31000", "31100", "31200", "31300", "31400", "31500"), 43.6047, 1.4442, 1,
         "+33 5 36 49", 7, "31555"),
    City("Nice", "Provence-Alpes-Côte d'Azur", ("06000", "06100", "06200", "06300"), 43.7102, 7.2620, 1, "+33 4 65 71",
         5, "06088"),
    City("Nantes", "Pays de la Loire", ("44000", "44100", "44200", "44300"), 47.2184, -1.5536, 1, "+33 2 61 91", 5,
         "44109"),
    City("Strasbourg", "Grand Est", ("67000", "67100", "67200"), 48.5734, 7.7521, 1, "+33 3 53 01", 4, "67482"),
    City("Montpellier", "Occitanie", ("34000", "34070", "34080", "34090"), 43.6108, 3.8767, 1, "+33 4 65 71", 4,
         "34172"),
    City("Bordeaux", "Nouvelle-Aquitaine", ("33000", "33100", "33200", "33300", "33800"), 44.8378, -0.5792, 1,
         "+33 5 36 49", 4, "33063"),
    City("Lille", "Hauts-de-France", ("59000", "59160", "59260", "59800"), 50.6292, 3.0573, 1, "+33 3 53 01", 4,
         "59350"),
    City("Rennes", "Bretagne", ("35000", "35200", "35700"), 48.1173, -1.6778, 1, "+33 2 61 91", 3, "35238"),
    City("Reims", "Grand Est", ("51100",), 49.2583, 4.0317, 1, "+33 3 53 01", 2, "51454"),
    City("Saint-Étienne", "Auvergne-Rhône-Alpes", ("42000", "42100"), 45.4397, 4.3872, 1, "+33 4 65 71", 2, "42218"),
    City("Le Havre", "Normandie", ("76600", "76610", "76620"), 49.4944, 0.1079, 1, "+33 2 61 91", 2, "76351"),
    City("Grenoble", "Auvergne-Rhône-Alpes", ("38000", "38100"), 45.1885, 5.7245, 1, "+33 4 65 71", 2, "38185"),
    City("Dijon", "Bourgogne-Franche-Comté", ("21000",), 47.3220, 5.0415, 1, "+33 3 53 01", 2, "21231"),
    City("Angers", "Pays de la Loire", ("49000", "49100"), 47.4784, -0.5632, 1, "+33 2 61 91", 2, "49007"),
    City("Nîmes", "Occitanie", ("30000", "30900"), 43.8367, 4.3601, 1, "+33 4 65 71", 2, "30189"),
    City("Clermont-Ferrand", "Auvergne-Rhône-Alpes", ("63000", "63100"), 45.7772, 3.0870, 1, "+33 4 65 71", 2, "63113"),
    City("Brest", "Bretagne", ("29200",), 48.3904, -4.4861, 1, "+33 2 61 91", 1, "29019"),
    City("Limoges", "Nouvelle-Aquitaine", ("87000", "87100"), 45.8336, 1.2611, 1, "+33 5 36 49", 1, "87085"),
    City("Ajaccio", "Corse", ("20000", "20090"), 41.9192, 8.7386, 1, "+33 4 65 71", 1, "2A004"),
)

_US_CITIES = (
    City("Boston", "MA", ("02108", "02115", "02118", "02127", "02130"), 42.3601, -71.0589, -5, "617", 8),
    City("Worcester", "MA", ("01602", "01604", "01605", "01609"), 42.2626, -71.8023, -5, "508", 4),
    City("Springfield", "MA", ("01103", "01104", "01108", "01109"), 42.1015, -72.5898, -5, "413", 3),
    City("Cambridge", "MA", ("02138", "02139", "02140", "02141"), 42.3736, -71.1097, -5, "617", 3),
    City("Lowell", "MA", ("01850", "01851", "01852", "01854"), 42.6334, -71.3162, -5, "978", 2),
    City("New Bedford", "MA", ("02740", "02744", "02745", "02746"), 41.6362, -70.9342, -5, "508", 2),
    City("Pittsfield", "MA", ("01201",), 42.4501, -73.2454, -5, "413", 1),
    City("Salem", "MA", ("01970",), 42.5195, -70.8967, -5, "978", 1),
    City("New York", "NY", ("10001", "10025", "10027", "10128", "10467"), 40.7128, -74.0060, -5, "212", 9),
    City("Chicago", "IL", ("60601", "60614", "60625", "60640"), 41.8781, -87.6298, -6, "312", 5),
    City("Houston", "TX", ("77002", "77004", "77025", "77054"), 29.7604, -95.3698, -6, "713", 5),
    City("San Antonio", "TX", ("78201", "78205", "78210"), 29.4241, -98.4936, -6, "210", 3),
    City("Denver", "CO", ("80202", "80205", "80210"), 39.7392, -104.9903, -7, "303", 3),
    City("Seattle", "WA", ("98101", "98103", "98109", "98122"), 47.6062, -122.3321, -8, "206", 3),
    City("Miami", "FL", ("33125", "33130", "33137", "33145"), 25.7617, -80.1918, -5, "305", 3),
)

_FR_MALE = (
    "Jean", "Pierre", "Michel", "André", "Philippe", "Alain", "Jacques", "Bernard", "Christophe", "Patrick",
    "Nicolas", "Daniel", "Frédéric", "Stéphane", "Sébastien", "Jérôme", "François", "Laurent", "Thierry", "Éric",
    "Hervé", "Benoît", "Gérard", "René", "Loïc", "Mathéo", "Théo", "Léo", "Lucas", "Hugo", "Gabriel", "Raphaël",
    "Noé", "Maël", "Timothée", "Clément", "Aurélien", "Joël", "Mohamed", "Karim", "Youssef", "Mamadou", "Grégoire",
    "Jean-Baptiste", "Jean-Luc", "Anaël", "Côme", "Gaëtan",
)
_FR_FEMALE = (
    "Marie", "Jeanne", "Françoise", "Monique", "Catherine", "Nathalie", "Isabelle", "Sylvie", "Christine", "Martine",
    "Valérie", "Sandrine", "Céline", "Stéphanie", "Hélène", "Émilie", "Aurélie", "Élodie", "Mélanie", "Chloé", "Léa",
    "Manon", "Zoé", "Inès", "Maëlle", "Anaïs", "Noémie", "Camille", "Océane", "Agnès", "Gaëlle", "Bérénice",
    "Josiane", "Geneviève", "Thérèse", "Renée", "Aïcha", "Fatoumata", "Yasmine", "Héloïse", "Clémence", "Joséphine",
    "Marie-Claire", "Anne-Sophie", "Léonie", "Solène",
)
_FR_FAMILY = (
    "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau", "Simon",
    "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier", "Morel", "Girard",
    "André", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Legrand", "Garnier", "Faure", "Rousseau", "Blanc",
    "Guérin", "Muller", "Henry", "Perrin", "Morin", "Mathieu", "Clément", "Gauthier", "Dumont", "Fontaine",
    "Chevalier", "Robin", "Masson", "Nguyen", "Boyer", "Denis", "Lemaire", "Duval", "Joly", "Gaillard", "Hébert",
    "Lévêque", "Bélanger", "Ménard", "Prévost", "Le Goff", "Le Gall", "N'Diaye", "Diallo", "Traoré", "Benali",
    "Haddad", "Da Silva", "Ferreira", "Saint-Martin", "D'Almeida", "Côté", "Brûlé", "Pâris",
)
_US_MALE = (
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas", "Christopher", "Daniel",
    "Matthew", "Anthony", "Mark", "Steven", "Paul", "Andrew", "Joshua", "Kevin", "Brian", "George", "Timothy",
    "Ronald", "Jason", "Ryan", "Jacob", "Ethan", "Noah", "Liam", "Mason", "José", "Luis", "Carlos", "Juan", "Jesús",
    "Andrés", "Wei", "Hiroshi", "Raj", "Jamal", "DeShawn", "Malik", "Seán", "Björn",
)
_US_FEMALE = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa",
    "Nancy", "Betty", "Sandra", "Margaret", "Ashley", "Emily", "Olivia", "Emma", "Ava", "Sophia", "Isabella", "Mia",
    "Abigail", "Harper", "Madison", "María", "Sofía", "Lucía", "Guadalupe", "Mónica", "Ana", "Mei", "Yuki", "Priya",
    "Aaliyah", "Imani", "Zoë", "Renée", "Siobhán", "Ingrid", "Mary-Kate",
)
_US_FAMILY = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "García", "Miller", "Davis", "Rodríguez", "Martínez",
    "Hernández", "López", "González", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
    "Pérez", "Thompson", "White", "Harris", "Sánchez", "Clark", "Ramírez", "Lewis", "Robinson", "Walker", "Young",
    "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker",
    "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "O'Brien", "O'Connor", "McDonald", "Kowalski",
    "Schäfer", "Nakamura", "Patel", "Kim", "Chen", "Cohen", "Ibáñez", "Núñez", "Peña", "Dvořák", "Van der Berg",
    "Fitzgerald", "Murphy", "Sullivan", "Smith-Jones",
)
_FR_STREET_TYPES = ("rue", "rue", "rue", "avenue", "boulevard", "place", "allée", "impasse", "chemin", "quai")
_FR_STREETS = (
    "de la République", "Victor Hugo", "Jean Jaurès", "des Lilas", "du Général de Gaulle", "Pasteur", "de la Gare",
    "des Écoles", "Émile Zola", "du Château", "Saint-Michel", "de la Paix", "des Acacias", "Voltaire", "Gambetta",
    "de Verdun", "du Moulin", "des Tilleuls", "Jules Ferry", "de l'Église", "Anatole France", "Sadi Carnot",
    "de la Libération", "Marcel Pagnol", "des Peupliers", "du 8 Mai 1945", "Édith Piaf", "Molière", "Lamartine",
    "Condorcet", "George Sand", "du Maréchal Foch", "des Frères Lumière", "de Strasbourg",
)
_US_STREETS = (
    "Main", "Maple", "Oak", "Pine", "Cedar", "Elm", "Washington", "Lake", "Hill", "Park", "Church", "Sunset",
    "Highland", "Chestnut", "Walnut", "Spruce", "Willow", "Jefferson", "Lincoln", "Franklin", "Madison", "Prospect",
    "Pleasant", "River", "Spring", "Center", "School", "Summer", "Union", "Mill", "Forest", "Meadow",
)
_US_STREET_TYPES = ("Street", "Street", "Avenue", "Road", "Lane", "Drive", "Court", "Place", "Way", "Boulevard",
                    "Terrace")
_FR_CLINICS = ("des Tilleuls", "du Parc", "Saint-Jean", "Sainte-Marie", "de l'Espérance", "des Cèdres", "du Lac",
               "Pasteur", "Bon Secours", "Jeanne d'Arc", "Les Peupliers", "Saint-Éloi")
_US_CLINICS = ("Riverside", "Lakeside", "Hillcrest", "Maple Grove", "Brookside", "Oak Valley", "Pinecrest",
               "Harbor View", "Meadowbrook", "Summit", "Greenfield", "Cedar Ridge")
_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")


def ascii_slug(text: str) -> str:
    """'Lefèvre-N'Diaye' → 'lefevrendiaye' (for e-mail addresses)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def identifier(type_code: str, type_display: str, system: str, value: str, use: str = "official") -> dict:
    """An Identifier typed with HL7 v2 table 0203 (MR, SS, NI, DL, NPI…)."""
    return {"use": use, "type": {"coding": [{"system": V2_0203, "code": type_code, "display": type_display}],
                                 "text": type_display},
            "system": system, "value": value}


def nir(rng: Random, gender: str, birth: date, birthplace: City) -> str:
    """A French NIR: sex, year and month of birth, commune of birth, order number, key (mod 97)."""
    sex = {"male": "1", "female": "2"}.get(gender) or rng.choice("12")
    body = f"{sex}{birth.year % 100:02d}{birth.month:02d}{birthplace.insee}{rng.randrange(1, 1000):03d}"
    numeric = int(body.replace("2A", "19").replace("2B", "18"))  # Corsica's departments, as the key rule says
    return f"{body}{97 - numeric % 97:02d}"


@dataclass(frozen=True)
class Locale(ABC):
    """Names, places and formats of one country; subclasses add what differs."""

    country: str
    language: Code
    male: tuple[str, ...]
    female: tuple[str, ...]
    family: tuple[str, ...]
    cities: tuple[City, ...]
    share: float

    def city(self, rng: Random) -> City:
        """A city, the larger ones more often."""
        return rng.choices(self.cities, weights=[c.weight for c in self.cities])[0]

    def given(self, rng: Random, gender: str) -> str:
        if gender not in ("male", "female"):
            gender = rng.choice(("male", "female"))
        return rng.choice(self.male if gender == "male" else self.female)

    def email(self, rng: Random, given: str, family: str) -> str:
        return f"{ascii_slug(given)}.{ascii_slug(family)}{rng.randrange(100)}@{rng.choice(_EMAIL_DOMAINS)}"

    @abstractmethod
    def identifiers(self, rng: Random, gender: str, birth: date, birthplace: City, adult: bool) -> list[dict]:
        """The national identifiers such a person carries."""

    @abstractmethod
    def street(self, rng: Random) -> str:
        """A street line: number and street name."""

    @abstractmethod
    def unit(self, rng: Random) -> str:
        """A second address line (building, apartment or suite)."""

    @abstractmethod
    def mobile(self, rng: Random, city: City) -> str:
        """A mobile number from the range reserved for fiction."""

    @abstractmethod
    def landline(self, rng: Random, city: City) -> str:
        """A landline number of the city's area, from the range reserved for fiction."""

    @abstractmethod
    def prefix(self, gender: str, married: bool) -> str | None:
        """The name prefix an adult of this gender carries."""

    @abstractmethod
    def hospital(self, city: City) -> str:
        """The name of the city's general hospital."""

    @abstractmethod
    def clinic(self, rng: Random, city: City) -> str:
        """The name of a private clinic or health centre."""


class French(Locale):
    def identifiers(self, rng: Random, gender: str, birth: date, birthplace: City, adult: bool) -> list[dict]:
        return [identifier("NI", "National unique individual identifier", NIR_SYSTEM,
                           nir(rng, gender, birth, birthplace))]

    def street(self, rng: Random) -> str:
        number = rng.randrange(1, 180)
        suffix = rng.choice(("", "", "", "", " bis", " ter"))
        return f"{number}{suffix} {rng.choice(_FR_STREET_TYPES)} {rng.choice(_FR_STREETS)}"

    def unit(self, rng: Random) -> str:
        return f"Bâtiment {rng.choice('ABCD')}, appartement {rng.randrange(1, 60)}"

    def mobile(self, rng: Random, city: City) -> str:
        return f"+33 6 39 98 {rng.randrange(100):02d} {rng.randrange(100):02d}"

    def landline(self, rng: Random, city: City) -> str:
        return f"{city.phone} {rng.randrange(100):02d} {rng.randrange(100):02d}"

    def prefix(self, gender: str, married: bool) -> str | None:
        return {"male": "M.", "female": "Mme"}.get(gender)

    def hospital(self, city: City) -> str:
        article = "d'" if city.name[0] in "AEIOUÉH" else "de "
        return f"Centre hospitalier {article}{city.name}"

    def clinic(self, rng: Random, city: City) -> str:
        return f"Clinique {rng.choice(_FR_CLINICS)}"


class American(Locale):
    def identifiers(self, rng: Random, gender: str, birth: date, birthplace: City, adult: bool) -> list[dict]:
        ssn = f"999-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"
        found = [identifier("SS", "Social Security Number", SSN_SYSTEM, ssn)]
        if adult and rng.random() < 0.7:
            found.append(identifier("DL", "Driver's License", DRIVERS_LICENSE_SYSTEM, f"S99{rng.randrange(10**6):06d}"))
        return found

    def street(self, rng: Random) -> str:
        return f"{rng.randrange(1, 9900)} {rng.choice(_US_STREETS)} {rng.choice(_US_STREET_TYPES)}"

    def unit(self, rng: Random) -> str:
        return f"{rng.choice(('Apt', 'Unit', 'Suite'))} {rng.randrange(1, 40)}{rng.choice(('', '', 'A', 'B'))}"

    def mobile(self, rng: Random, city: City) -> str:
        return f"+1 {city.phone}-555-01{rng.randrange(100):02d}"

    def landline(self, rng: Random, city: City) -> str:
        return self.mobile(rng, city)  # North American numbers do not tell mobiles apart

    def prefix(self, gender: str, married: bool) -> str | None:
        if gender == "male":
            return "Mr."
        if gender == "female":
            return "Mrs." if married else "Ms."
        return None

    def hospital(self, city: City) -> str:
        return f"{city.name} General Hospital"

    def clinic(self, rng: Random, city: City) -> str:
        return f"{rng.choice(_US_CLINICS)} {rng.choice(('Family Health Center', 'Primary Care', 'Medical Group'))}"


FRANCE = French("FR", (BCP47, "fr-FR", "French (France)"), _FR_MALE, _FR_FEMALE, _FR_FAMILY, _FR_CITIES, 0.55)
UNITED_STATES = American("US", (BCP47, "en-US", "English (United States)"), _US_MALE, _US_FEMALE, _US_FAMILY,
                         _US_CITIES, 0.45)
LOCALES: tuple[Locale, ...] = (FRANCE, UNITED_STATES)


def pick_locale(rng: Random) -> Locale:
    return FRANCE if rng.random() < FRANCE.share else UNITED_STATES


def address(rng: Random, locale: Locale, city: City, *, unit_chance: float = 0.25) -> dict:
    """A home or work address with Synthea's geolocation extension (a quasi-identifier)."""
    line = [locale.street(rng)]
    if rng.random() < unit_chance:
        line.append(locale.unit(rng))
    return {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
            {"url": "latitude", "valueDecimal": round(city.lat + rng.uniform(-0.04, 0.04), 6)},
            {"url": "longitude", "valueDecimal": round(city.lon + rng.uniform(-0.04, 0.04), 6)},
        ]}],
        "line": line,
        "city": city.name,
        "state": city.region,
        "postalCode": rng.choice(city.postcodes),
        "country": locale.country,
    }
